"""A registry-like HTTP/1.1 blob server for the lazy-pulling tests.

    python -m erofs_domains.programs.blobserver --root DIR --listen ADDR:PORT [--admin-socket PATH]

serves `DIR/blobs/sha256/<hex>` (the OCI image-layout) at `/v2/<repo>/blobs/sha256:<hex>`
for any repository name: HEAD gives the size, GET the content, a single `Range: bytes=...`
gives 206 with Content-Range, an unsatisfiable or malformed one 416 with
`Content-Range: bytes */SIZE` (a multi-range request gets the whole blob, which RFC 9110
allows). Connections are kept alive. It prints `READY http://ADDR:PORT` once listening
(PORT 0: any free port) and stops cleanly on SIGTERM.

It counts what it serves (requests, methods, statuses, body bytes, per blob, and a log of
recent requests) and can misbehave on purpose. Both are reached through the admin API,
under `/_admin/` on the HTTP port and, independent of the network (a link that is down, a
namespace), on the Unix socket `--admin-socket`:

    GET    /_admin/stats        counters (see `Stats.snapshot`)
    POST   /_admin/reset        zero the counters
    GET    /_admin/faults       active faults
    POST   /_admin/faults       add one: JSON {"mode": ..., params} (see `FAULT_MODES`)
    DELETE /_admin/faults       remove all (stalled requests are released and closed)
    GET    /_admin/ping         {"pid": ...}


The modules, one job each:

    blobs.py     the blob store on disk (OCI layout), `publish()`, blob URLs
    server.py    `BlobServer` in this process: routes, single ranges, counters (`Stats`)
    faults.py    the fault table: `FAULT_MODES`, what each does to an answer, which request it hits
    client.py    `BlobServerClient`, the admin API over the Unix socket or HTTP
    process.py   `BlobServerProcess`: the server as a child process, optionally in a network
                 namespace (`erofs_domains.programs.netns`)
    __main__.py  the command line above
"""
