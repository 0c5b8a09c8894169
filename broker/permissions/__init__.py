"""Live permission sources: what the backend says the delegating human may do, next to the policy's grants."""
