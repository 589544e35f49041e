"""The HTTP server: Flask routes, server state, metrics, and the gunicorn launcher."""
