"""Break-glass: the only way to an access marked `break_glass`, and the post-review of each use."""
