-- Each cell's crop at a network input size, as raw uint8 RGB (issue 17).
-- Prediction, training and evaluation read these instead of fetching and decoding a
-- 282 px PNG per cell from object storage each time (~6 ms a cell, serialised by the
-- local S3 server). `pixels` is `bmcell.preprocess.crop_to_uint8(crop, size)`:
-- size * size * 3 bytes, row-major (y, x, channel). The segmenter writes the default
-- input size with the cells; other sizes are filled in on first read. A cache only:
-- losing a row costs a recomputation from the crop in object storage, never data.
CREATE TABLE cell_thumbs (
    cell_id  bigint  NOT NULL REFERENCES cells (id) ON DELETE CASCADE,
    size     integer NOT NULL CHECK (size > 0 AND size % 16 = 0),
    pixels   bytea   NOT NULL CHECK (length(pixels) = size * size * 3),
    PRIMARY KEY (cell_id, size)
);
