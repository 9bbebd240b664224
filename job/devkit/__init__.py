"""Development tooling, not deployed: the local stack (``make serve``) and the random-weight demo-model factories."""
