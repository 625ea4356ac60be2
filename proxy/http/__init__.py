"""The proxy's two HTTP edges: the client's side (``ingress``: what comes in, request
bodies, CORS, forwarding headers; ``wire``: what we read from and write into OpenAI
bodies) and the upstream's (``upstream``: header hygiene and opening a request;
``h1``/``h1_conn``: the pooled HTTP/1.1 client; ``sse``: event scanning; ``relay``: the
loop that reads the upstream and writes the client)."""
