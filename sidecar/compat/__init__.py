"""Checked access to the libraries the sidecar relies on beyond their public API."""
