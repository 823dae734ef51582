package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"time"
)

// watchFile reports on the returned channel each time the content of path
// changes, checking every interval until ctx ends. It compares content,
// not modification times, so an editor's rename dance or a ConfigMap's
// symlink swap counts, and a touch does not. Polling works on every file
// system and bind mount, where change notifications do not.
func watchFile(ctx context.Context, path string, interval time.Duration) <-chan struct{} {
	changed := make(chan struct{}, 1)
	sum := func() []byte {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		s := sha256.Sum256(data)
		return s[:]
	}
	d := &settledChange{last: sum()}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				if d.check(sum()) {
					select {
					case changed <- struct{}{}:
					default:
					}
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return changed
}

// settledChange decides, check by check, when a file has changed. A
// change counts once the new content has held for two checks in a row: a
// file written in place is empty, then half written, for a moment, and
// half a config can be a valid one with models missing. A file that
// cannot be read (nil) is no change: it is being replaced.
type settledChange struct {
	last []byte // the content last reported, or found at the start
	seen []byte // the content at the previous check
}

func (d *settledChange) check(now []byte) bool {
	settled := bytes.Equal(now, d.seen)
	d.seen = now
	if now == nil || !settled || bytes.Equal(now, d.last) {
		return false
	}
	d.last = now
	return true
}
