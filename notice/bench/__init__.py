"""`make bench`: the fast engine's cost per patched run against hooked patching, per family (its layout in
`notice.bench.layouts`), and the attribution screen's cost; run as `python -m notice.bench`."""
