"""Built-in plugins, one module per technique; written exactly like third-party plugins."""
