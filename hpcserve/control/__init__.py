"""The head node's control API (FastAPI on uvicorn, next to the router): the run, its workers, recent events
and operator actions (drain, restart, rotation, routing policy). It reads the Redis registry the agents write
and the router's /metrics and /workers; actions go to the node agents through the registry's commands channel
and to the router through the registry's policy choices, and each is recorded in the events stream."""
