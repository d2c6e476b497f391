"""The demo task: generated scenes of coloured shapes, their captions and question/answer pairs."""
