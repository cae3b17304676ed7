"""Guard: what an edit may touch and run with: paths and integrity, the static policy, the sandbox, secrets."""
