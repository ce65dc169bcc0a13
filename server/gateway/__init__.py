"""The browser gateway: HTTP/JSON and server-sent events, transcoded from the
protos' `google.api.http` annotations and forwarded to the gRPC server."""
