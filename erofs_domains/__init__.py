"""The library of the EROFS shared-domain test suite, in layers (docs/architecture.md); a layer
imports only from itself and the layers above it in this list (tests/unit/test_layers.py):

  base      standard library only: cmd(), digests, the erofs-utils probe, the run configuration
  programs  run as `python -m`: the on-demand daemon, the blob server, the netns helper
  guest     where the kernel under test runs: rules, mounts, images, observers, the fscache and
            page-cache rigs and oracles
  host      the controller: kernel and erofs-utils builds, VMs and their guard, compare, bisect
  (fixtures/, a package of its own: the pytest plugin on top of all four)
"""
