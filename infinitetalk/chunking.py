"""Chunk plan of the streaming (autoregressive) generation.

Official rule (``wan/multitalk.py::generate_infinitetalk``; SPEC §4.4, golden README §3):

* chunk ``k`` covers output/audio frames ``[s*k, s*k + frame_num)`` with stride
  ``s = frame_num - motion_frames`` (72 for 81/9);
* after chunk ``k`` is generated, if the next chunk's end ``>= min(max_frames, T)`` the next
  chunk is the last one; when that end reaches past the audio (``end >= T``) the audio
  embedding is extended by ``miss = end - T + 3`` frames (time-reversed copy of its tail)
  before that last chunk;
* clip mode (``max_frames <= frame_num``): one chunk only;
* chunk 0 contributes all ``frame_num`` frames, later chunks drop their first
  ``motion_frames`` frames; the result is cut to ``min(T, max_frames)`` frames.

Product extension: the official code refuses audio with ``T <= frame_num`` frames. We plan
exactly one chunk of ``frame_num`` frames (the audio is end-padded before it, with the same
``miss = frame_num - T + 3`` rule) and trim the output to ``T`` frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["DEFAULT_FRAME_NUM", "DEFAULT_MOTION_FRAMES", "ChunkPlan", "plan_chunks", "motion_latent_frames"]

#: Frames per chunk (21 latent frames) and context frames of chunks >= 1 (official defaults).
DEFAULT_FRAME_NUM = 81
DEFAULT_MOTION_FRAMES = 9


def motion_latent_frames(motion_pixel_frames: int, temporal_stride: int = 4) -> int:
    """Number of latent frames of ``motion_pixel_frames`` pixel frames (1 -> 1, 9 -> 3)."""
    return 1 + (motion_pixel_frames - 1) // temporal_stride


@dataclass(frozen=True)
class ChunkPlan:
    """The chunk schedule for one generation.

    Attributes:
        num_audio_frames: ``T``, frames of the (unpadded) audio embedding.
        frame_num: frames per chunk (81).
        motion_frames: context frames re-used by chunks >= 1 (9).
        max_frames: the cap that was applied (None: no cap).
        starts: first audio/output frame of each chunk (``audio_start_idx``).
        motion_frames_per_chunk: pixel context frames of each chunk (1 for chunk 0).
        pad_before: frames to append (reversed tail) to the audio embedding right before
            generating each chunk (0 except possibly for the last chunk).
        padded_lengths: audio embedding length while each chunk is generated.
        final_frame_count: frames in the final video.
        official: False when the official code would have refused the input
            (``T <= frame_num``: our single-chunk extension).
    """

    num_audio_frames: int
    frame_num: int
    motion_frames: int
    max_frames: Optional[int]
    starts: tuple[int, ...]
    motion_frames_per_chunk: tuple[int, ...]
    pad_before: tuple[int, ...]
    padded_lengths: tuple[int, ...]
    final_frame_count: int
    official: bool

    @property
    def num_chunks(self) -> int:
        return len(self.starts)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(s + self.frame_num for s in self.starts)

    def kept_frames(self, k: int) -> int:
        """Frames chunk ``k`` appends to the output (before the final cut)."""
        return self.frame_num - (0 if k == 0 else self.motion_frames_per_chunk[k])

    def motion_latents(self, k: int, temporal_stride: int = 4) -> int:
        """Latent context frames ``n_m`` of chunk ``k`` (1 for chunk 0, 3 later with 9 frames)."""
        return motion_latent_frames(self.motion_frames_per_chunk[k], temporal_stride)

    @property
    def generated_frames(self) -> int:
        """Frames produced before the final cut."""
        return sum(self.kept_frames(k) for k in range(self.num_chunks))


def _miss(end: int, length: int) -> int:
    return end - length + 3 if end >= length else 0


def plan_chunks(
    num_audio_frames: int,
    max_frames: Optional[int] = None,
    frame_num: int = DEFAULT_FRAME_NUM,
    motion_frames: int = DEFAULT_MOTION_FRAMES,
) -> ChunkPlan:
    """Plan the chunks for ``num_audio_frames`` audio frames (25 fps).

    Args:
        num_audio_frames: ``T`` >= 1.
        max_frames: optional cap on the output length (the official ``max_frame_num``;
            ``<= frame_num`` selects clip mode). None means no cap.
        frame_num: frames per chunk (``4k + 1``).
        motion_frames: context frames of chunks >= 1 (``< frame_num``).
    """
    T = int(num_audio_frames)
    if T < 1:
        raise ValueError(f"num_audio_frames must be >= 1, got {num_audio_frames}")
    if not 0 < motion_frames < frame_num:
        raise ValueError(f"motion_frames must be in (0, frame_num), got {motion_frames}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    cap = max_frames if max_frames is not None else T
    limit = min(cap, T)
    final = min(T, cap)

    if T <= frame_num:
        miss = _miss(frame_num, T)
        return ChunkPlan(T, frame_num, motion_frames, max_frames, (0,), (1,), (miss,),
                         (T + miss,), final, official=False)

    clip_mode = max_frames is not None and max_frames <= frame_num
    stride = frame_num - motion_frames
    starts, motions, pads, lengths = [0], [1], [0], [T]
    length = T
    while True:
        next_start = starts[-1] + stride
        next_end = next_start + frame_num
        if clip_mode:
            break
        pad = 0
        last = next_end >= limit
        if last:
            pad = _miss(next_end, length)
            length += pad
        starts.append(next_start)
        motions.append(motion_frames)
        pads.append(pad)
        lengths.append(length)
        if last:
            break
    return ChunkPlan(T, frame_num, motion_frames, max_frames, tuple(starts), tuple(motions),
                     tuple(pads), tuple(lengths), final, official=True)
