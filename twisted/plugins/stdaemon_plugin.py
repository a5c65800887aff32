from twisted.application.service import ServiceMaker

stdaemon = ServiceMaker(
    "stdaemon",
    "stdaemon.tap",
    "SimpleTuner cloud-training operations server",
    "stdaemon",
)
