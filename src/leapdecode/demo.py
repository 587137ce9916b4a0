"""The built-in demo prompt: an editing task, where the answer copies most of the input."""

DEMO_PROMPT = """Correct the spelling mistakes in the following text and write out the whole corrected text.

The comittee met on tuesday to discus the new libary budget. After a long debate, the members agreed to
recieve more funding for childrens books and to extend the opening hours on weekends. The chairman thanked
everyone for there patience and said the changes would begin next month. Several parents had writen
letters asking for a quiet reading room, and the comittee promised to look at the old storage area on
the second floor. The treasurer warned that the heating sytem is old and may need to be replaced before
winter, wich could take a large part of the budget. A final vote on the plan will be held at the next
meeting.
"""
