"""The images the VM tests use, built on the host before the VMs start.

Generating content trees and running mkfs.erofs under TCG takes minutes; natively it takes
seconds. The controller calls `prebuild()` (conftest.py), which fills the shared image
cache; tests then find their images there. An image missing from this list still works,
it is just built inside the guest.
"""

N_MAX = 8  # the largest N of the domain scenarios


def recipes(small, tiny):
    """Callables that build (or find) each image; `small`/`tiny` are ImageFactory objects."""
    out = [lambda n=n: small.single(n) for n in ("smoke", "lazypull")]
    out += [lambda n=n: tiny.single(n) for n in
            ("replies", "bad-single", "lpopen", "lpnet", "lpbad", "failover", "death", "cull")]
    out += [lambda: tiny.layer("base")]
    out += [lambda i=i: tiny.layered("base", f"app{i}") for i in range(1, N_MAX + 1)]
    out += [lambda i=i: tiny.layered("lpbase", f"lpapp{i}") for i in range(1, 5)]
    out += [lambda n=n: tiny.blobdev(n) for n in ("stress", "death-dom", "bad-blobdev")]
    out += [lambda: tiny.blobdev("nd", blob_name="sharedblob")]
    return out


def prebuild(small, tiny, jobs: int = 2) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return len(list(pool.map(lambda build: build(), recipes(small, tiny))))
