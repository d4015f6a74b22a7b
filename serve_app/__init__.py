"""Ray Serve front of pagedserve: OpenAI-compatible ingress, engine replicas, free-blocks router.

`app` is the Serve application builder: `serve run pagedserve.serve_app:app model=...`, or from the repo
root `serve run serve_app:app ...`. Absolute imports keep the deployments under their
`pagedserve.serve_app.*` names, which Ray workers import from the installed package.
"""

from pagedserve.serve_app.app import app, build_app

__all__ = ["app", "build_app"]
