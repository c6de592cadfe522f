"""Routes of the query service, one module per resource."""
