"""Redis fixtures: the shared server at REDIS_URL, private servers, a three-node cluster."""
