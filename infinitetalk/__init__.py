"""InfiniteTalk: audio-driven talking video of any length on Wan2.1-I2V-14B + diffusers.

Importing the package is cheap; heavy modules (torch, diffusers, transformers) are
imported by the submodules that need them.
"""

__version__ = "0.1.0"
