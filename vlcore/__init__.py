"""What RECO and µ-VLA share: Flax encoders with HF checkpoint import/export, the sentence encoder.

Later: the device-mesh training core and the embedded-default world.
"""
