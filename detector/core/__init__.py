"""What every stage shares: typed errors, image decoding, the label map, storage, masks, detections."""
