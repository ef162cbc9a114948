"""Helpers for nwcap's tests, samples and benchmark; not part of the installed product.

``synth`` builds captures byte by byte (frames, DNS, TLS, HTTP, a VM's traffic) so that every
figure a test checks is known by construction.
"""
