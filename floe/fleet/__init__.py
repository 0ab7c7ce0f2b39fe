"""Several replica processes of one model behind one endpoint: placement, supervision, routing."""
