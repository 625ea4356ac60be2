"""Shared test helpers. Test modules import the pure ones from here; the resources
(upstreams, proxies, databases, Redis servers, issuers) come as fixtures from the
conftest.py files, which build them with these modules.

- ``env``: paths, the test keys, the shared Redis/PostgreSQL, free ports, subprocess env
- ``leaks``: ``SECRETS`` and the captured output the end-of-run key scan reads
- ``properties``: the hypothesis profiles and ``examples(n)``
- ``inproc``: the proxy as an in-process server (``Proxy``, ``MakeProxy``, ``Recorder``)
- ``servers``: throwaway backing servers (``RedisServer``, PostgreSQL ``Cluster``)
- ``served``: ``python -m proxy serve`` processes (``serve``, ``Served``)
- ``ledger``: reading and comparing the usage ledger, the spool
- ``load``: the one load generator (``Load``)
- ``keys``: declaring and issuing keys, keyed configs, clients that leave
- ``admin``: the admin API and its OpenAPI checks
- ``issuer``: an OpenID Connect / JWT issuer
- ``rawhttp``, ``faultproxy``: raw HTTP/1.1 and a fault-injecting TCP relay
- ``figures``: the adversity suite's figures (``count``, ``measure``)
- ``wait``: ``until``
- ``probe``: a proxy worker with a window into it (run as a module)
"""
