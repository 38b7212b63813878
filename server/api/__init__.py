"""HTTP routes: thin handlers over :class:`tessera.server.service.Service`."""
