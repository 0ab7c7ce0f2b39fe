"""Transports shared by the front end and the replicas: the gRPC servicers and server factory
(grpc.py) and the one bearer-token check (auth.py). The HTTP app lives in floe/frontend/, because
only the front end speaks HTTP."""
