"""Tests of proxy/http/: the wire format, the relay, the SSE scanner, the HTTP/1.1 client, TLS."""
