"""The tiny generated scene the session's fitted model is built from (sizes the tests check)."""

TRAIN_CLIPS, TEST_CLIPS, FRAMES = 4, 2, 24
