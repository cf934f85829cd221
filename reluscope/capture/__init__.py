"""Capture routes: each one feeds (site, tensor) pairs into a SiteRecorder."""
