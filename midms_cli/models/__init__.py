"""Neural networks: the LDM first stage and UNet, and the MIDMs correspondence networks."""
