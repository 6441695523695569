"""One router per file; each handler validates, calls a service, shapes the response."""
