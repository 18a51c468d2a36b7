"""HL7 v2 in (issue 23): orders and patient updates from a RIS or HIS over MLLP, applied to the
Modality Worklist and, for patient updates and merges, to the archive through its corrections.

  header.py     the envelope: MSH, the character set, the refusals (AE, AR) and the ACKs
  messages.py   bytes -> typed operations (python-hl7 parses; every value checked by
                pacsd.query.worklist.clean_step)
  apply.py      Receiver: the operations applied to the worklist and, through the corrections,
                to the archive; one answer per message, never an exception
  mllp.py       MllpListener: the bounded MLLP listener ([hl7] port, off by default)
"""

from pacsd.hl7.apply import Receiver
from pacsd.hl7.mllp import MllpListener

__all__ = ["MllpListener", "Receiver"]
