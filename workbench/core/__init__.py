"""The bottom layer: the vocabulary every other layer speaks.

Errors users see (:mod:`.errors`), where files live (:mod:`.paths`), which device models run
on (:mod:`.device`), circuit components (:mod:`.components`), progress reporting
(:mod:`.progress`), crash-safe file writes (:mod:`.files`) and the in-process memo of what
depends only on a base model's weights (:mod:`.memo`). Nothing here imports another
workbench layer.
"""
