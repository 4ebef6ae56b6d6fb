"""The admin API's routes, one module per area."""
