/* An image attachment at full size, over the page: closed by Escape, the
 * close button, or a click beside the picture. */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;

  ChatApp.views.LightboxView = Backbone.View.extend({
    className: 'lightbox',
    template: ChatApp.template('lightbox-template'),

    attributes: {
      role: 'dialog',
      'aria-modal': 'true',
      tabindex: '-1'
    },

    events: {
      'click': 'clicked',
      'click [data-action="close"]': 'close'
    },

    initialize: function (options) {
      this.attachment = options.attachment;
      this.files = options.files;
      this.returnFocus = document.activeElement;
      this.onKey = _.bind(function (event) {
        if (event.key === 'Escape') {
          this.close();
        }
      }, this);
    },

    render: function () {
      var a = this.attachment;
      this.el.setAttribute('aria-label', a.name);
      this.$el.html(this.template({
        name: a.name,
        url: this.files.url(a.id, false),
        width: a.width || 0,
        height: a.height || 0,
        details: _.compact([a.width && a.height ? a.width + '\u00d7' + a.height : '', models.formatSize(a.size)]).join(' \u00b7 ')
      }));
      return this;
    },

    open: function () {
      document.body.appendChild(this.render().el);
      document.addEventListener('keydown', this.onKey);
      this.$('[data-action="close"]').trigger('focus');
      return this;
    },

    // Beside the picture and its caption: close.
    clicked: function (event) {
      if (event.target === this.el || event.target.classList.contains('lightbox-figure')) {
        this.close();
      }
    },

    close: function () {
      this.remove();
    },

    remove: function () {
      document.removeEventListener('keydown', this.onKey);
      var back = this.returnFocus;
      this.returnFocus = null;
      Backbone.View.prototype.remove.call(this);
      if (back && back.isConnected && typeof back.focus === 'function') {
        back.focus();
      }
      return this;
    }
  });
})(ChatApp, Backbone, _);
