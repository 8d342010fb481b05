"""Every sequence's block table, mirrored as one row of a host array.

``Sequence.block_table`` (a list) stays the truth the block manager works with; this mirror
lets the batch builder take a whole step's block tables with one indexing operation instead
of flattening Python lists of every sequence's blocks each step (that work grows with the
sequences' lengths). The block manager writes a row only when a sequence gains or loses blocks.
"""

from __future__ import annotations

import numpy as np


class BlockTableRows:
    """An ``int32 [rows, columns]`` array; a sequence holds one row while it holds blocks.

    Both dimensions grow (doubling) on demand. Entries past a sequence's table length are stale
    and meaningless: readers take ``[:len(block_table)]`` or pad with what they like.
    """

    def __init__(self, rows: int = 64, columns: int = 64) -> None:
        self.array = np.zeros((rows, columns), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))

    def take_row(self) -> int:
        if not self._free_rows:
            rows = self.array.shape[0]
            self._grow(rows * 2, self.array.shape[1])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def release_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, first: int, blocks: list[int]) -> None:
        """Set ``row[first : first + len(blocks)]``."""
        end = first + len(blocks)
        if end > self.array.shape[1]:
            self._grow(self.array.shape[0], max(end, 2 * self.array.shape[1]))
        if len(blocks) == 1:
            self.array[row, first] = blocks[0]
        else:
            self.array[row, first:end] = blocks

    def _grow(self, rows: int, columns: int) -> None:
        grown = np.zeros((rows, columns), dtype=np.int32)
        old_rows, old_columns = self.array.shape
        grown[:old_rows, :old_columns] = self.array
        self.array = grown
