"""tsnsrv: expose local web services on a Tailscale tailnet, each as its own machine."""

__version__ = "0.1.0"
