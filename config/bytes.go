package config

import (
	"fmt"
	"strconv"
	"strings"
)

// Bytes is a memory size. In YAML it is a whole number of bytes or a
// number with a unit: KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB
// (powers of 1000); "Gi" and friends are read as GiB.
type Bytes int64

var units = []struct {
	suffix string
	scale  int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"B", 1},
}

// ParseBytes reads a memory size such as "80GiB", "512 MiB" or "1024".
func ParseBytes(s string) (Bytes, error) {
	t := strings.TrimSpace(s)
	scale := int64(1)
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, scale = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.scale
			break
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	// !(f >= 0) refuses NaN too, which converts to a negative Bytes.
	if err != nil || !(f >= 0) {
		return 0, fmt.Errorf("invalid memory size %q: want a number of bytes or a number with a unit such as 80GiB", s)
	}
	v := f * float64(scale)
	if v > 1<<62 {
		return 0, fmt.Errorf("memory size %q is too large", s)
	}
	return Bytes(v), nil
}

// String renders b in GiB, MiB or bytes.
func (b Bytes) String() string {
	switch {
	case b >= 1<<30:
		return strconv.FormatFloat(float64(b)/(1<<30), 'f', -1, 64) + "GiB"
	case b >= 1<<20:
		return strconv.FormatFloat(float64(b)/(1<<20), 'f', -1, 64) + "MiB"
	}
	return strconv.FormatInt(int64(b), 10) + "B"
}
