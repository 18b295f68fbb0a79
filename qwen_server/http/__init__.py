"""Everything that imports Litestar: the routes, the policy each declares, the request log and the one
mapping from domain errors to HTTP answers."""
