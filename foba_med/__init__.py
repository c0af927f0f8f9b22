"""foba_med: the chest X-ray extension of foba (paper Sec. 4 "Medical Image Analysis" and supplement).

Readers and vocabulary added to the natural-image pipeline of ``foba_core``:

- ``mimic``      MIMIC-CXR(-JPG) tables, image/report paths, CXR images (JPG/PNG/DICOM), dataset, index
- ``reports``    report sections, the impression prompt, tokenizer-length truncation
- ``ms_cxr``     MS-CXR findings, union box masks, the image/mask preprocessing geometry
- ``vocabulary`` the eight MS-CXR findings and the words that express them in a prompt
- ``phantom``    a synthetic chest X-ray world written in the real MIMIC-CXR-JPG + MS-CXR layout
"""
