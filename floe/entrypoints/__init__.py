"""The commands a user runs, parsing only; each hands a settings tree to the code that serves.

    cli.py              `floe serve | embed | embed-corpus | bench | info` (also `python -m floe`)
    replica_manager.py  `python -m floe.entrypoints.replica_manager`: ArcticInference's replica
                        manager's command line (public gRPC only), so its users change one command

A model replica's own process entry is `python -m floe.replica` (floe/replica/__main__.py): it is
started by the fleet's supervisor, or by hand to run and debug one replica alone.
"""
