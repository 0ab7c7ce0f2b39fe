"""floe on Ray (the optional extra ``floe[ray]``): serve.py is a Ray Serve deployment of the floe
replica. Offline corpus embedding on Ray lives in floe/corpus/ray_pool.py. ``floe serve``
never imports this package."""
