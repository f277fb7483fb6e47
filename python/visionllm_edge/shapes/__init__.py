"""The shapes world: scenes, instruction data, a pixel checker and the evaluation of shapes-tiny."""
