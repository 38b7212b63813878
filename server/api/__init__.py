"""HTTP routes: thin handlers over :class:`server.service.Service`."""
