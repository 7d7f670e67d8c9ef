"""The bottom layer: the vocabulary every other layer speaks.

Errors users see (:mod:`.errors`), where files live (:mod:`.paths`), which device models run
on (:mod:`.device`), circuit components (:mod:`.components`), progress reporting
(:mod:`.progress`) and crash-safe file writes (:mod:`.files`). Nothing here imports another
workbench layer.
"""
