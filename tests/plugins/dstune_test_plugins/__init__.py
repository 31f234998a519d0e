"""dstune's test plugins: a package outside dstune that adds methods, objectives and a domain through entry points,
as a user's package would (installed by `make test`'s setup; see pyproject.toml)."""
