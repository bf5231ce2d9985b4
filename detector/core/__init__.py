"""What every stage shares: typed errors, image decoding, the label map, storage, masks, detections.

The package imports nothing itself: ``detector.core.errors`` stays as light as the config that uses it.
"""
