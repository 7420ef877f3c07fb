"""Files on disk: atomic writes, the LeRobot v3 dataset format and the preference-set format. Imports no other
package of this project, and neither torch nor transformers."""
