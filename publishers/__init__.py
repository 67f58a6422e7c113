"""Devices: frame sources, sensor noise, and the MQTT publishers that ship frames.

This package also owns the device protocol (wire format, topic names, MQTT
session settings), because it is the only edgeq package a device installs.
"""
