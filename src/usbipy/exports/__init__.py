"""Which devices usbipyd exports, by rule, as they come and go: the rules, where
`usbipy bind --device` keeps its own, and the engine that applies them on
hotplug."""
