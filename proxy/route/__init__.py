"""``kvproxy route``: a cache-aware router in front of several ``kvproxy serve`` replicas.

`picking` (the `Picker` contract and the baseline pickers), `replicas` (health and load of each
replica), `forward` (one request to a replica and its answer back, with retries), `metrics`, and
`app` (`create_route_app`); `scoring` holds the cache-aware picker that plugs into them.
"""
